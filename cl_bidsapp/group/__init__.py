"""cl_bidsapp.group"""
