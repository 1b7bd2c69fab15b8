"""cl_bidsapp.models"""
