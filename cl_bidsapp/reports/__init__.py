"""cl_bidsapp.reports"""
